"""Test-side support code: guest programs and VMM helpers the tests share."""
