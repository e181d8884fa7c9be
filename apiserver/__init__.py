"""The Kubernetes REST API over corral's etcd store (`corral apiserver`)."""
