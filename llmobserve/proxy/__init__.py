"""The forwarding proxy: routing, target policy, relay, upstream pool.

Public face: L{ProxyResource} (a twisted.web resource a user can mount),
L{ProxySite} (the site that streams request bodies to it), the
L{Transaction} record and the L{ITransactionSink} interface.
"""

from llmobserve.proxy._resource import ProxyResource, ProxySite
from llmobserve.transaction import Context, ITransactionSink, Outcome, Transaction

__all__ = ["Context", "ITransactionSink", "Outcome", "ProxyResource", "ProxySite", "Transaction"]
