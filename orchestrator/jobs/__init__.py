"""What every job kind shares: its account of charges (``accounting``)."""
