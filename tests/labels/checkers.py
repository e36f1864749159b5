"""Answer checkers for the tests, named module:function as a user would."""


def even_length(text: str, answer) -> bool:
    """'Right' when the text has an even number of characters: a deterministic mix of labels on random models."""
    return len(text) % 2 == 0


not_callable = 3
