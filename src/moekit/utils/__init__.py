"""Small helpers at the bottom of the dependency graph (they import nothing of moekit but `errors`)."""
