"""postwell.master"""
