"""The download stage and its helpers: the network guard (which addresses may be fetched), robots.txt and opt-out
headers, per-host politeness, bounded image decoding and the decode memory budget."""
