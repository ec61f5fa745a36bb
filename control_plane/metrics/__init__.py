"""What agents measured: roll-ups and retention of metric windows, and reports read from them."""
