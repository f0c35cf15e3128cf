"""postwell.dsn"""
