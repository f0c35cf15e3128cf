"""postwell.queue"""
