"""Build or buy: what self-hosting costs at the throughput `tandem bench serve` measured,
against API prices. model.py is the arithmetic, prices.py the dated reference prices,
cli.py the `tandem cost` command (table, JSON line, and a plot of cost against volume)."""
