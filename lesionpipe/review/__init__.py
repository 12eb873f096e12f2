"""lesionpipe.review"""
