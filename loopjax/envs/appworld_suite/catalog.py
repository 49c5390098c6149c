"""Every template of the suite, in build order (a new template goes at the end)."""
import files
import notes
import phone
import todoist
import venmo

TEMPLATES = (*notes.TEMPLATES, *phone.TEMPLATES, *files.TEMPLATES,
             *venmo.TEMPLATES, *todoist.TEMPLATES,)
