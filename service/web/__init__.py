"""The web page at ``/``: static HTML, CSS and JavaScript modules that call the API with relative URLs."""
