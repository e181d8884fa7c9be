"""corral.cluster"""
