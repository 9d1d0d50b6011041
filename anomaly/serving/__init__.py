"""What runs inside Triton or starts it: the steps' tensor I/O and input checks, the launcher, the
serving layout per machine. Imports the core (anomaly), never the clients."""
