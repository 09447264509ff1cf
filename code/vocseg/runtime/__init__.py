"""What every script does around its own work: processes, signals, logging, seeds."""
