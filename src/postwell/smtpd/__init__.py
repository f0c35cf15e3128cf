"""postwell.smtpd"""
