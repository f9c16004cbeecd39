"""The display: what a notebook's front end shows. HTML reprs and their Jinja2 templates, experiment tables
and the compare grid, and the ipywidgets (`display.widgets`), with the Jupyter server's save hook.

Nothing is imported here: the reprs need only Jinja2, the widgets need ipywidgets.
"""
