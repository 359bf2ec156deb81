"""What every part uses and nothing else of sslbench: errors, atomic writes, collectives over ranks,
schedules, and the few names two parts must agree on (the small-image threshold, collapse criteria)."""
