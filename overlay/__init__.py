"""corral.overlay"""
