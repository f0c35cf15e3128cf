"""postwell.cleanup"""
