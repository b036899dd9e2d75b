"""Config schemas (what each option may hold) and the checks of a composed config."""
