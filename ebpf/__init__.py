"""corral.ebpf"""
