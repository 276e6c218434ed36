"""slmpack: profile small language models and pack their replicas onto shared GPUs."""

__version__ = "0.1.0"
API_GROUP = "slmpack.dev"
API_VERSION = "v1alpha1"

