"""postwell.tables"""
