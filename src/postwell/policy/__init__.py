"""postwell.policy"""
