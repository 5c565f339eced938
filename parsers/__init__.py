"""Sans-I/O provider registry, usage parsers and pricing. Never imports Twisted."""
