"""The node agent (`corral node`): the overlay, the CNI server and the pod runtime
composed into one daemon. It sits above the components so none of them imports
another (docs/internals.md, Layers)."""
