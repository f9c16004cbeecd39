"""ipywidgets front ends for mochi_lab (issue 5)."""
