"""lesionpipe.interfaces"""
