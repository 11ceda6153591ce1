"""moe-router-operator: a kopf operator for MoERouter objects (moerouter.io/v1alpha1)."""

__version__ = "0.1.0"
