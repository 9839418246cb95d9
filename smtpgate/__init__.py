"""smtpgate: a filtering SMTP front-end proxy speaking Postfix's restriction model."""

__version__ = "0.1.0"
