"""Models: a ``ModelMixin`` port of the original openaimodel ``UNetModel`` with identical state-dict keys."""
