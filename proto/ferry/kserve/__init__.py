"""KServe protocol definitions (see ``ferry.kserve.v2``)."""
