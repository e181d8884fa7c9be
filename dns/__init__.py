"""corral.dns"""
