"""What a run found, read from its folder: the front and its picks, the text of `inspect`, its PNG
plots and the HTML page. Nothing here loads a model or imports torch."""
