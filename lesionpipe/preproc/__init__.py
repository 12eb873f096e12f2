"""lesionpipe.preproc"""
