"""lesionpipe.lesions"""
