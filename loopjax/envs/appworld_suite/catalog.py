"""Every template of the suite, in build order (a new template goes at the end)."""
import notes

TEMPLATES = (*notes.TEMPLATES,)
