"""One module per benchmark family, each reproducing its reference scorer (named in its docstring)."""
