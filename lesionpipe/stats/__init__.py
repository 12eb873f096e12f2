"""lesionpipe.stats"""
