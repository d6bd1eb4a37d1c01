"""streamrec: clickstream to recommendations, per AWS region.

This package is the small shared core: settings, the event schema, the lake layout, the AWS client
factory, structured logging, the local development stack and the ``streamrec`` CLI (the composition
root, which imports the other top-level packages lazily).
"""

__version__ = "0.1.0"
