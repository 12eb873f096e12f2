"""lesionpipe.reports"""
