"""Background jobs: execs that outlive their request, their output kept in bounded rings."""
