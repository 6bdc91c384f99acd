"""Reading finished runs back: summaries now, the HTML report and `why`/`diff` later."""
