"""postwell.cli"""
