"""tiamat's one HTTP/1.1 core: request reading (h1), response framing (response), errors.

Every worker class uses these modules; none of them performs I/O.
"""
