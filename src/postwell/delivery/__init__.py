"""postwell.delivery"""
