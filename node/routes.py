"""Route numbers corral's kernel state is written and read with."""

RTPROT_CORRAL = 77  # the protocol of every route corral writes: tells its own from others'
RTNH_F_ONLINK = 4  # the gateway is on the link even outside its subnet (VXLAN next hops)
MAIN_TABLE = 254
