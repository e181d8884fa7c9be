"""corral.cni"""
