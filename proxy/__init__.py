"""corral.proxy"""
