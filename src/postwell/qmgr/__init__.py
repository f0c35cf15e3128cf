"""postwell.qmgr"""
